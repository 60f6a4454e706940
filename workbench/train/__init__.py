"""Training small reference models on CPU (`workbench train …`).

    loop.py      AdamW + warmup/cosine + clipping, load-balance and z losses, checkpoint/resume, loss curve
    data.py      domain corpus with held-out split; synthetic key–value and arithmetic documents
    bpe.py       byte-level BPE with the Llama 4 special tokens at the end of the vocabulary
    evaluate.py  held-out loss vs unigram, domain specialization, retrieval at 1–16× length
    recipe.py    the `tiny-moe` configuration and pipeline
    cli.py       `add_train_parser(subparsers)`
"""
