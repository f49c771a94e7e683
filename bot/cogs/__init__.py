"""The bot's features, one extension each."""
