"""Who may call what: bearer tokens (API, admin), user tokens, what a user token may reach."""
