"""Pure tables and in-process tests: no servers, no child processes."""
