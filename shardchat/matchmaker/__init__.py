"""The matchmaker: the queue of waiting students and the claims of teachers."""
