"""megaray.trainers"""
