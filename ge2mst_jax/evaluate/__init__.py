"""Using a trained network: reports in both modes (`report`), SOPs and energy (`energy`), and the
spike-driven audit of spike mode's traced program (`spike_audit`).
"""
