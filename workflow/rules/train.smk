# Every value that comes from the grid config reaches the shell quoted (:q).
# One experiment per cell, through the same `pml-plugins train` a user runs. The job first
# writes the cell's config (from params, so that an edited grid reruns the cells it
# changed; a run folder holding another config is cleared), then trains with --resume.


rule train:
    """Train and evaluate one cell; --resume continues a killed run from its last epoch."""
    input:
        unpack(tuned_input),
    output:
        cfg=run_file("cell.yaml"),
        metrics=run_file("metrics.json"),
        manifest=run_file("manifest.json"),
        config=run_file("config.yaml"),
        points=run_file("test_embeddings.npz"),
    log:
        run_file("train.log"),
    benchmark:
        run_file("benchmark.tsv")
    container:
        CONTAINER
    threads: config["threads"]
    resources:
        gpu=gpus_of,
    params:
        cell=cell_json,
        out=lambda wildcards, output: os.path.dirname(output.metrics),
        launcher=launcher,
        best=lambda wildcards, input: input.get("best", ""),
        write_cell=script("grid.py"),
    shell:
        "python {params.write_cell:q} {output.cfg:q} {params.cell:q} {params.best:q} "
        ">> {log:q} 2>&1 && "
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
        "{params.launcher} pml-plugins train {output.cfg:q} --out {params.out:q} --resume "
        ">> {log:q} 2>&1"
