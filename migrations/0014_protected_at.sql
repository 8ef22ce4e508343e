-- `vmha report`: a VM's availability counts from when it was protected, not from the start of
-- the window (a VM protected yesterday with an hour down is not 99.9% available over 30 days).
-- NULL: protected before this column existed, or not protected; counted over the whole window.
ALTER TABLE vms ADD COLUMN protected_at timestamptz;
