"""baton.decode"""
