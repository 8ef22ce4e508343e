//! libvirt job statistics through the raw API.
//!
//! `virt::Domain::job_stats` builds a `Vec` over libvirt's allocation and aborts the process
//! when there is no job, so this calls `virDomainGetJobStats` itself, reads the
//! typed parameters it needs and frees them with `virTypedParamsFree`.

use std::ffi::CStr;
use std::os::raw::c_int;

use virt::domain::Domain;
use virt::sys;

/// The fields vmha reads; absent fields are zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobStats {
    /// `VIR_DOMAIN_JOB_NONE` when no job runs.
    pub job_type: c_int,
    pub time_elapsed_ms: u64,
    pub downtime_ms: u64,
    pub data_total: u64,
    pub data_processed: u64,
    pub data_remaining: u64,
}

impl JobStats {
    pub fn is_active(&self) -> bool {
        self.job_type != sys::VIR_DOMAIN_JOB_NONE as c_int
    }
}

/// Reads the current job's statistics, or with `completed` those of the last finished job.
pub fn read(dom: &Domain, completed: bool) -> Result<JobStats, virt::error::Error> {
    let flags = if completed { sys::VIR_DOMAIN_JOB_STATS_COMPLETED } else { 0 };
    let mut job_type: c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut nparams: c_int = 0;
    // SAFETY: `dom` holds a valid reference; libvirt fills the out-pointers and on success
    // hands us `params` (possibly null) which we free below with libvirt's own allocator.
    let rc =
        unsafe { sys::virDomainGetJobStats(dom.as_ptr(), &mut job_type, &mut params, &mut nparams, flags) };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    let get = |name: &CStr| -> u64 {
        let mut v: std::os::raw::c_ulonglong = 0;
        if params.is_null() {
            return 0;
        }
        // SAFETY: params/nparams come from the successful call above; name is NUL-terminated.
        let found = unsafe { sys::virTypedParamsGetULLong(params, nparams, name.as_ptr(), &mut v) };
        if found == 1 { v } else { 0 }
    };
    let stats = JobStats {
        job_type,
        time_elapsed_ms: get(sys::VIR_DOMAIN_JOB_TIME_ELAPSED),
        downtime_ms: get(sys::VIR_DOMAIN_JOB_DOWNTIME),
        data_total: get(sys::VIR_DOMAIN_JOB_DATA_TOTAL),
        data_processed: get(sys::VIR_DOMAIN_JOB_DATA_PROCESSED),
        data_remaining: get(sys::VIR_DOMAIN_JOB_DATA_REMAINING),
    };
    if !params.is_null() {
        // SAFETY: allocated by libvirt for this call and not used after this point.
        unsafe { sys::virTypedParamsFree(params, nparams) };
    }
    Ok(stats)
}

/// Switches a running migration to post-copy (no safe wrapper exists in `virt`).
pub fn start_post_copy(dom: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: `dom` holds a valid reference for the duration of the call.
    if unsafe { sys::virDomainMigrateStartPostCopy(dom.as_ptr(), 0) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Aborts the domain's current job (no safe wrapper exists in `virt`).
pub fn abort(dom: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: `dom` holds a valid reference for the duration of the call.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}
