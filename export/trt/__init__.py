"""TensorRT engines from an exported ONNX engine dir (one job per file):

    profiles.py   the optimization profiles, derived from manifest.json (pure)
    key.py        engine.json: the compatibility key (ONNX hashes, profiles, dtype, builder settings,
                  TensorRT version, GPU name, compute capability, SM count) and the refusal of a
                  mismatched engine (pure, given the device facts)
    host.py       what a GPU target needs on this machine (tensorrt importable, a CUDA GPU, the named one)
    build.py      the TensorRT API: parse the ONNX, configure, build, write engine.plan + timing cache

The engine dir after `python -m export engine --target <gpu>`:

    manifest.json, model.onnx(+data), tokenizer files   the fp16 export (export/onnx_export.py)
    <method>-tree.json                                   the tree(s) installed for the device
    engine.plan                                          the serialized TensorRT engine
    timing.cache                                         the builder's tactic timings (reused by rebuilds)
    engine.json                                          written last: the key the runtime checks

`tensorrt` is imported only inside the functions that need it (it is an optional extra); everything
else is tested on CPU.
"""
