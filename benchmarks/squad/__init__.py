"""MiniLM-L6 on SQuAD v1.1: the method table (`table`)."""
