"""Collectors: agentless sources next to each host and the backup pipeline that feeds the server."""
