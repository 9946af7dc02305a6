"""KV-cache data structures shared by the router and the workers."""
