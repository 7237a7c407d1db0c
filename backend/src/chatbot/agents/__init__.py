"""The LangGraph graph that answers a conversation turn: a router and specialised agents."""
