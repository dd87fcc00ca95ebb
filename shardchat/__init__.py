"""shardchat: a live tutoring chat server spread over one trio process per core."""

__version__ = "0.1.0"
