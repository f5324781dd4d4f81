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
    params:
        runs=lambda wildcards, input: os.path.commonpath(input.metrics),
        out=lambda wildcards, output: os.path.dirname(output.csv),
        paper=lambda wildcards, input: f"--paper-numbers {input.paper}" if input.paper else "",
    container: CONTAINER
    shell:
        "pml-plugins aggregate {params.runs} --out {params.out} {params.paper} > {log} 2>&1"
