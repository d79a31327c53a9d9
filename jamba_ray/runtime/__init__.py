"""Where stages run: Ray actors (`pipeline.py`) or in-process (`local.py`), and how hidden states
travel between them (`transport.py`, `wire.py`)."""
