"""Domain types and API schemas, used by every layer and using none of them."""
