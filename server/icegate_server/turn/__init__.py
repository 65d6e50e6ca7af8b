"""TURN: credentials, the rotating secret ring, coturn's userdb and config."""
