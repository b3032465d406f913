"""What `docker compose up` needs in place before it starts: `rpo compose init`."""
