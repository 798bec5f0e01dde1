"""baton.prefill"""
