"""A parameter budget as the input: `choose` picks each conv's cpg (`select`) by its cost (`sensitivity`)."""
