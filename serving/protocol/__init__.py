"""Wire formats: LoRAX's native API (``lorax``) and the OpenAI API (``openai``), as pydantic models.

The paths that generate text are listed once here, for the server and the router alike.
"""

LORAX_PATHS = frozenset({"/", "/generate", "/generate_stream"})
#: OpenAI generation paths and the protocol name the request log records for each
OPENAI_PATHS = {"/v1/completions": "openai_completions", "/v1/chat/completions": "openai_chat"}
GENERATION_PATHS = LORAX_PATHS | frozenset(OPENAI_PATHS)
