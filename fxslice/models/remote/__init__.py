"""Files copied into exported model directories (`fxslice export --format hf`); fxslice never imports them."""
