"""Worst-case protection audit: a battery of attackers against one protection, one verdict."""
