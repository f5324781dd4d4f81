# Every run folder -> runs.csv, summary.csv and, per data set, table.md and the plots.


rule aggregate:
    """Tables (mean ± 95% CI over seeds, paper numbers beside ours) and plots."""
    input:
        metrics=all_metrics(),
        paper=paper_numbers(),
    output:
        **aggregate_outputs(),
    log:
        f"{RUNS}/aggregate.log",
    container:
        CONTAINER
    params:
        # the grid's run folders lie below their common folder (one cell: the folder itself)
        runs=lambda wildcards, input: os.path.commonpath(
            [os.path.dirname(m) for m in input.metrics]
        ),
        out=lambda wildcards, output: os.path.dirname(output.csv),
        paper_option="--paper-numbers" if config.get("paper_numbers") else "",
        paper=lambda wildcards, input: input.paper[0] if input.paper else "",
    shell:
        "pml-plugins aggregate {params.runs:q} --out {params.out:q} "
        "{params.paper_option} {params.paper:q} > {log:q} 2>&1"
