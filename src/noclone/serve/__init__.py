"""The real-time cloaking service (`noclone serve`): an ASGI app with a web page, RID batching and a job queue.

    from noclone.serve import app
    application = app("rid")            # or app("rid,aspl", model="sandbox", token="...")
    # uvicorn.run(application, host="127.0.0.1", port=8000)
"""

from noclone.serve.server import ServeConfig, app, check_bind
from noclone.serve.limits import Limits

__all__ = ["Limits", "ServeConfig", "app", "check_bind"]
