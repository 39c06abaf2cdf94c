"""rmfast-serve: an exported reward model as an HTTP server for RL loops (see docs/serve.md).

- ``protocol``: the requests and responses of every route (pydantic models, the OpenAPI page's schemas);
- ``inputs``: a request's texts as the scorer's token groups (rmfast-score's tokenization and length policy);
- ``batcher``: concurrent requests merged into prefix-shared forwards up to a token budget, off the event loop;
- ``app``: the FastAPI routes, errors, metrics and the command line."""
