"""Object stores: the protocol and its types, S3 (boto3 and the lean GET path),
what a response must be, object checksums, key names.

Imports base only.
"""
