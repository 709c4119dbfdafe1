"""The local web demo (app.py): a Gradio page over the sampling package, offline."""
import os

# Gradio reads this when it is imported: no usage analytics or version checks leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
