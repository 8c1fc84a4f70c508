"""The inference server's routes, one module per protocol: ``lorax``, ``openai``, ``admin``, ``status``.

Each module's function builds an ``APIRouter`` over one ``Service``; handlers only translate
between the wire format (``serving.protocol``) and the service.
"""
