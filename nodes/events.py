"""Messages to the browser: thread-safe PromptServer.send_sync, silent when there is no server."""


def send(event: str, data: dict):
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data)
