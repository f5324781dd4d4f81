# Every run folder -> runs.csv, summary.csv and, per data set, table.md and the plots.
# Inputs: each run's metrics.json, config.yaml, manifest.json and (trained runs) the
# test_embeddings.npz the scatter draws. The training curves read each run's record-keeper
# logs/ where present, undeclared: Snakemake deletes a job's declared outputs before it
# reruns it, and a killed run's loss history is what --resume continues.


rule aggregate:
    """Tables (mean ± 95% CI over seeds, paper numbers beside ours) and plots."""
    input:
        metrics=all_metrics(),
        runs=all_run_files(),
        paper=paper_numbers(),
    output:
        **aggregate_outputs(),
    log:
        f"{RUNS}/aggregate.log",
    container:
        CONTAINER
    params:
        # exactly the grid's run folders (a stale folder beside them is not read)
        runs=lambda wildcards, input: [os.path.dirname(m) for m in input.metrics],
        out=lambda wildcards, output: os.path.dirname(output.csv),
        paper_option="--paper-numbers" if config.get("paper_numbers") else "",
        paper=lambda wildcards, input: input.paper[0] if input.paper else "",
    shell:
        "pml-plugins aggregate {params.runs:q} --out {params.out:q} "
        "{params.paper_option} {params.paper:q} > {log:q} 2>&1"
