"""The command line: parsing, output and exit codes. Never imports pyfuse3."""
