"""The IAIS ablation (launch/ablation.py): variants x seeds of one fine-tuning config, each its own DeepSpeed
process, compared with the 'none' baseline (plan, runner, stats, results, report, plots, tracking, driver)."""
