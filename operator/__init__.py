"""baton.operator"""
