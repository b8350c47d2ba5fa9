"""An OpenAI-compatible HTTP server with a web playground, over the continuous-batching engine.

    from gptgen import load
    from gptgen.serve import create_app
    app = create_app(load("runs/chatbot"), max_batch=16, served_model_name="chatbot")
    # uvicorn.run(app, host="127.0.0.1", port=8000), or `gptgen serve --model runs/chatbot`

Needs the `serve` extra (FastAPI, uvicorn). See docs/serving.md.
"""

from ..errors import GptgenError


def create_app(lm, **options):
    """The FastAPI app serving a LanguageModel; see gptgen.serve.app.create_app for the options."""
    try:
        from .app import create_app as _create_app
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise GptgenError(f"Serving needs FastAPI and uvicorn ({exc}); install them with "
                          "pip install 'gptgen[serve]'.") from None
    return _create_app(lm, **options)


__all__ = ["create_app"]
