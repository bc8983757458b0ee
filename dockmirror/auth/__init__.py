"""Access control: the API-key store, bearer tokens and the checks on ``/v2``."""
