"""sparkd: many vLLM models on one GPU box, started on demand, behind one OpenAI endpoint."""

__version__ = "0.1.0"
