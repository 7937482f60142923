"""Object stores: the protocol and its types, S3 (boto3 and the lean GET path, reads
and writes), the error table, one retry policy, what a response and its body must
be, object checksums and the check S3 offers, key names.

Imports base only.
"""
