"""A worker process: owns the websocket connections handed to it and their chats."""
