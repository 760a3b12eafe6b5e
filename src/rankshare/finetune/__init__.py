"""The ``rankshare`` command-line tool: fine-tune and compare adapters on real data (beside the library)."""
