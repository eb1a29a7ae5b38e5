"""Publishing to the Hugging Face Hub: generated model cards (`card`, Jinja templates) and the upload (`publish`)."""
