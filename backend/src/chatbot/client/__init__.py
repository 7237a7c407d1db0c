"""``chatbot chat``: a terminal client of the native HTTP API.

It knows the server only through HTTP (conversations, streamed turns, cache stats), so it
works the same against a remote server and against one started in this process; nothing
here imports the API, the services or the engines.
"""
