"""The front router: reads request heads and hands sockets to workers."""
