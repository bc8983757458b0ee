"""Several dockmirror nodes as one service: state in PostgreSQL, blobs in S3.

Needs the ``cluster`` extra: ``pip install 'dockmirror[cluster]'``.
"""
