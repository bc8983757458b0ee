"""The self-service portal under ``/portal/``: sign-in, API keys and usage for users.

Optional (``[portal] enabled``).  Its parts: ``config`` (the ``[portal]``
section), ``sessions`` (server-side sessions, sign-in states and disabled
users, in their own SQLite file), ``login`` (GitHub and OpenID Connect),
``api`` (the JSON API), ``pages`` and ``charts`` (HTML and SVG rendered on the
server), ``resource`` (the tree under ``/portal``) and ``service`` (assembly).
"""
