"""megaray.models.common"""
