"""The reference tutoring workload as a benchmark: load bots, runner and report.

``shardchat bench`` (``runner``) starts the server and the bot processes
(``bots``), then checks every chat's log and summarizes the run (``report``).
"""
