"""Authentication and authorization (issue #15 §3): users, grants, tokens, the
failed-login limit (pure cores) and their shells (the user store in the
``system_auth`` keyspace, the checks every front end calls, the admin routes)."""
