"""The one table: measured values, ratios against local disk or the best peer, PASS/FAIL."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Row:
    workload: str
    system: str
    profile: str
    measure: str
    value: float
    unit: str
    ratio: float | None = None  # against `versus`
    versus: str = ""
    target: str = ""  # e.g. ">= 0.8", "" = information only
    result: str = ""  # PASS / FAIL / "" (no target)


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, row: Row) -> Row:
        if row.target.startswith("=="):  # a count that must be exact
            row.result = "PASS" if row.value == float(row.target.split()[1]) else "FAIL"
        elif row.target and row.ratio is not None:
            op, bound = row.target.split()
            ok = {">=": row.ratio >= float(bound), "<=": row.ratio <= float(bound)}[op]
            row.result = "PASS" if ok else "FAIL"
        elif row.target:
            row.result = "FAIL"  # a target we could not measure is not a pass
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def table(self) -> str:
        head = ("workload", "system", "net", "measure", "value", "ratio", "target", "result")
        lines = [head]
        for r in sorted(self.rows, key=lambda r: r.workload[:2]):  # stable: run order within
            ratio = f"{r.ratio:.2f}x {r.versus}" if r.ratio is not None else ""
            value = f"{r.value:,.1f} {r.unit}" if r.value < 100 else f"{r.value:,.0f} {r.unit}"
            lines.append(
                (r.workload, r.system, r.profile, r.measure, value, ratio, r.target, r.result)
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
            for line in lines
        ]
        out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(out + [f"- {n}" for n in self.notes])

    def json(self) -> dict[str, object]:
        return {"rows": [asdict(r) for r in self.rows], "notes": self.notes}
