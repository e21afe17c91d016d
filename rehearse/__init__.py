"""``make rehearse``: the card's recipes at the card's model sizes (see rehearse/__main__.py)."""
